// GET each URL with java.net.http.HttpClient, no TLS options: JAVA_TOOL_OPTIONS' trust store only.
// usage: java Client.java URL...   Prints one line per URL: STATUS VERSION BODY.
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;

public class Client {
    public static void main(String[] args) throws Exception {
        System.err.println("client java " + System.getProperty("java.version"));
        HttpClient client = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(20)).build();
        for (String url : args) {
            HttpRequest req = HttpRequest.newBuilder(URI.create(url)).timeout(Duration.ofSeconds(20)).build();
            HttpResponse<String> r = client.send(req, HttpResponse.BodyHandlers.ofString());
            System.out.println(r.statusCode() + " " + r.version() + " " + r.body().trim());
        }
    }
}
